use crate::util::Server;
