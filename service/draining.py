"""`Connection: close` on every response while the server drains, so clients move to other replicas.

A balancer that picks a replica per connection (a Kubernetes Service, a TCP load balancer) keeps
sending a keep-alive client's requests to the replica it picked, even after that replica left the
endpoints. During the shutdown delay (service/server.py) each response therefore closes its
connection: the client's next request opens a new one, which the balancer sends to a replica that
is still ready. The header is decided when the response starts, so requests accepted before SIGTERM
and answered after it close their connections too.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.state import ServingState

CLOSE = (b"connection", b"close")


class CloseWhileDraining:
    """ASGI middleware adding `Connection: close` to HTTP responses once `state.draining` is set."""

    def __init__(self, app: ASGIApp, state: ServingState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.state.draining:
                message = {**message, "headers": [*message.get("headers", ()), CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)
