"""The capd wire protocol, version 1: every method, event, result and the manifest."""

VERSION = "0.1.0"
SERVER_NAME = f"capd {VERSION}"
