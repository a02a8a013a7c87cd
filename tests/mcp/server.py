"""An MCP server on the official Python SDK, for the mesh's tests of MCP tools.

    server.py stdio            # over stdin and stdout
    server.py http PORT        # streamable HTTP on 127.0.0.1:PORT/mcp
"""

import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("notes")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two whole numbers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def refuse(reason: str) -> str:
    """Always fails, saying why (a tool error: the model is told)."""
    raise ToolError(reason)


@server.tool()
def environment() -> str:
    """The names of the variables this server was started with."""
    return " ".join(sorted(os.environ))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
