//! remus-config
