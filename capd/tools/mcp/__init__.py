"""Tools from MCP servers (§12). Nothing here imports the `mcp` SDK at import time: it
takes seconds to load, so only `client.py` imports it, and only when a pod with
`mcp_servers` comes up."""
