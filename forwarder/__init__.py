"""forwarder: distribution lists on top of a catch-all mailbox."""

__version__ = "0.1.0"
