"""capd: the daemon that hosts AI agent pods."""
