__version__ = "0.1.0"

#: Where `casd serve` listens and `casctl` connects unless told otherwise. Here, not in
#: casd.server.daemon, so that casctl starts without importing the server and the store.
DEFAULT_PORT = 7420
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
