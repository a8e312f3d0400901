"""Small shared helpers: command-line error reporting, config resolvers, loggers."""
