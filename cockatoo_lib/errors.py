class CockatooError(Exception):
    """Bad input or configuration. The message is one line that names what and where;
    the command line prints it without a traceback and exits with code 2."""
