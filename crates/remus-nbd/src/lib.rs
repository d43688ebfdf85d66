//! remus-nbd
