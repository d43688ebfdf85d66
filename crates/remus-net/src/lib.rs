//! remus-net
