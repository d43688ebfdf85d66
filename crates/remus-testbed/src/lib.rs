//! remus-testbed
