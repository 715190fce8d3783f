"""An MCP client for the guard's tests: the official SDK's client, driven from the command line.

Session mode, one MCP session that runs every STEP in order:

    python client.py --url URL [--cafile CERT.pem] [--token JWT] [--mode auto|legacy|modern]
                     [--header 'Name: value']... [--timeout S] STEP...

Each STEP is a JSON object, and prints exactly one JSON line to stdout:

    {"list": true}                        -> {"tools": [{"name", "description", "inputSchema"}, ...]}
    {"call": NAME, "arguments": {...}}    -> {"isError": bool, "text": "<text contents joined by \\n>",
                                              "structured": <structuredContent or null>}

A step that fails prints {"error": {"code": int, "message": str}} instead, plus "data" when
the JSON-RPC error carries some, and "http_status" and "www_authenticate" (null when absent)
when an HTTP response of status >= 400 came back during the step. `code` is null when the
failure is not an MCP error (e.g. the result does not match the tool's output schema). An
HTTP error without a JSON-RPC error body reaches the SDK as code -32603 (as -32600 "Session
terminated" for a 404 once a session id is held). The next step runs regardless, except
when the transport itself fails (e.g. the connection drops without a response): the session
is then over, and that step and every later one print the same error line, code null.

If the session cannot be opened, a single line is printed instead of the steps' lines:
{"http_error": STATUS, "www_authenticate": "<header or null>", "body": "<text>"} with exit
status 0 when the server answered with an HTTP status >= 400, else
{"connect_error": {"code": int or null, "message": str}} with exit status 2.

Modes, mapped onto the SDK's `Client(mode=...)`:
- auto: the SDK default, "auto": a `server/discover` probe at 2026-07-28 first, then the
  `initialize` handshake when the probe fails with anything but -32022 naming only
  versions this client lacks (an HTTP 4xx without a JSON-RPC body counts as a failure).
- legacy: "legacy": the `initialize` handshake (protocol 2025-11-25), `Mcp-Session-Id`.
- modern: the version string "2026-07-28" (`mcp_types.version.LATEST_MODERN_VERSION`):
  the per-request envelope adopted directly, with no probe and no handshake.

The client's response cache is off, so every step reaches the server. Note that the SDK
checks a tool result against the tool's output schema, and lists the tools first (one more
`tools/list` on the wire) when this session has not listed them yet.

Raw mode, one hand-made HTTP request, for the cases an SDK would never send:

    python client.py --raw --url URL [--cafile CERT.pem] [--token JWT] [--method POST]
                     [--header 'Name: value']... [--body TEXT | --body @FILE] [--timeout S]

It sends `Content-Type: application/json` and `Accept: application/json, text/event-stream`
unless --header overrides them, and prints {"status": int, "headers": {lowercase name: value},
"body": "<text>"}; "timed_out": true is added when the body did not end within --timeout
(e.g. an SSE stream left open), with what arrived until then. When no response comes
(connection refused or reset, TLS failure, timeout before the status line) it prints
{"connect_error": {"code": null, "message": str}} and exits with status 2; a server that
answers an oversize body early and closes the connection may end up here too, since the
whole body is written before the response is read.

TLS: --cafile is the only trust anchor (cloudletd's self-signed certificate); without it the
system's are used. Proxy variables from the environment are ignored.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from contextlib import AsyncExitStack

import httpx2

MODES = ("auto", "legacy", "modern")

# Raw mode needs only httpx2; the SDK (a second or two to import) is loaded for sessions.
if "--raw" not in sys.argv:
    import anyio
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError
    from mcp_types.version import LATEST_MODERN_VERSION


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def parse_headers(args) -> dict[str, str]:
    headers = {}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            sys.exit(f"--header {h!r} is not 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def tls(args):
    if not (args.cafile or args.cert):
        return True
    ctx = ssl.create_default_context(cafile=args.cafile)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


class HttpErrors:
    """Remembers the last HTTP response with status >= 400 (its body read in full)."""

    def __init__(self):
        self.last: httpx2.Response | None = None

    async def hook(self, response: httpx2.Response) -> None:
        if response.status_code >= 400:
            await response.aread()
            self.last = response

    def as_json(self) -> dict:
        r = self.last
        return {
            "http_error": r.status_code,
            "www_authenticate": r.headers.get("www-authenticate"),
            "body": r.text,
        }


def leaf(exc: BaseException) -> BaseException:
    """The first MCP error inside nested exception groups, else the first leaf."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [leaf(e) for e in exc.exceptions]
        return next((e for e in leaves if isinstance(e, MCPError)), leaves[0])
    return exc


def error_json(exc: BaseException, http: HttpErrors) -> dict:
    exc = leaf(exc)
    if isinstance(exc, MCPError):
        err = {"code": exc.code, "message": exc.message}
        if exc.data is not None:
            err["data"] = exc.data
    else:
        err = {"code": None, "message": f"{type(exc).__name__}: {exc}"}
    if http.last is not None:
        err["http_status"] = http.last.status_code
        err["www_authenticate"] = http.last.headers.get("www-authenticate")
    return {"error": err}


async def list_tools(client: Client) -> dict:
    tools, cursor = [], None
    while True:
        page = await client.list_tools(cursor=cursor)
        for t in page.tools:
            tools.append({"name": t.name, "description": t.description, "inputSchema": t.input_schema})
        cursor = page.next_cursor
        if not cursor:
            return {"tools": tools}


async def call_tool(client: Client, step: dict) -> dict:
    result = await client.call_tool(step["call"], step.get("arguments") or {})
    text = "\n".join(c.text for c in result.content if c.type == "text")
    return {"isError": result.is_error, "text": text, "structured": result.structured_content}


async def run_session(args, steps: list[dict]) -> int:
    http = HttpErrors()
    async with httpx2.AsyncClient(
        verify=tls(args),
        headers=parse_headers(args),
        timeout=httpx2.Timeout(args.timeout),
        trust_env=False,
        event_hooks={"response": [http.hook]},
    ) as http_client:
        client = Client(
            streamable_http_client(args.url, http_client=http_client),
            mode=LATEST_MODERN_VERSION if args.mode == "modern" else args.mode,
            read_timeout_seconds=args.timeout,
            cache=None,
        )
        try:
            await client.__aenter__()
        except Exception as e:  # the session never opened
            exc = leaf(e)
            if http.last is not None and isinstance(exc, MCPError):  # the SDK's spelling of an HTTP error
                emit(http.as_json())
                return 0
            code = exc.code if isinstance(exc, MCPError) else None
            emit({"connect_error": {"code": code, "message": f"{type(exc).__name__}: {exc}"}})
            return 2
        done = 0
        try:
            async with AsyncExitStack() as stack:
                stack.push_async_exit(client)
                for step in steps:
                    http.last = None
                    try:
                        if "call" in step:
                            emit(await call_tool(client, step))
                        else:
                            emit(await list_tools(client))
                    except Exception as e:
                        emit(error_json(e, http))
                    done += 1
        except Exception as e:  # the transport failed (e.g. the connection dropped): the session is over
            lost = error_json(e, http)
            for _ in steps[done:]:
                emit(lost)
    return 0


def run_raw(args) -> int:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    headers.update(parse_headers(args))
    body = args.body
    if body is not None and body.startswith("@"):
        with open(body[1:], "rb") as f:
            body = f.read()
    elif body is not None:
        body = body.encode()
    out = {}
    chunks = []
    try:
        with httpx2.Client(verify=tls(args), timeout=httpx2.Timeout(args.timeout), trust_env=False) as http:
            with http.stream(args.method, args.url, headers=headers, content=body) as response:
                out["status"] = response.status_code
                out["headers"] = {k: ", ".join(response.headers.get_list(k)) for k in response.headers.keys()}
                try:
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                except httpx2.ReadTimeout:
                    out["timed_out"] = True
    except httpx2.TransportError as e:  # no response: refused, TLS failure, reset, timeout
        emit({"connect_error": {"code": None, "message": f"{type(e).__name__}: {e}"}})
        return 2
    out["body"] = b"".join(chunks).decode("utf-8", errors="replace")
    emit(out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", help="PEM certificate(s) to trust instead of the system's")
    parser.add_argument("--token", help="sent as Authorization: Bearer TOKEN")
    parser.add_argument("--cert", help="client certificate (PEM) presented in the TLS handshake")
    parser.add_argument("--key", help="the client certificate's private key (PEM)")
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--raw", action="store_true", help="send one hand-made HTTP request")
    parser.add_argument("--method", default="POST", help="raw mode: HTTP method (default POST)")
    parser.add_argument("--body", help="raw mode: request body, or @FILE to send a file")
    parser.add_argument("steps", nargs="*", metavar="STEP", help="JSON step (session mode)")
    args = parser.parse_args()

    if args.raw:
        if args.steps:
            parser.error("--raw takes no STEP")
        return run_raw(args)
    try:
        steps = [json.loads(s) for s in args.steps]
    except json.JSONDecodeError as e:
        parser.error(f"a STEP is not JSON: {e}")
    for step in steps:
        if not (isinstance(step, dict) and (step.get("list") is True or isinstance(step.get("call"), str))):
            parser.error(f'a STEP is {{"list": true}} or {{"call": NAME, "arguments": {{}}}}, not {step!r}')
    return anyio.run(run_session, args, steps)


if __name__ == "__main__":
    sys.exit(main())
