//! remus-image
