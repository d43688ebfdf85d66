//! remus-qmp
