//! remus-agent
