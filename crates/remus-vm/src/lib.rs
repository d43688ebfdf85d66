//! remus-vm
