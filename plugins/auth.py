"""API keys with roles: who may call the gateway, which models each key may use, and the admin API for keys.

Enable it in gateway.yaml (``plugins: {auth: {}}``) and every call needs a key the gateway issued
(``multiverse keys create``, ``POST /admin/keys``), sent as the OpenAI SDK sends its ``api_key``:
``Authorization: Bearer mvk-...`` (or ``X-API-Key``). The config's admin key stays a superuser.
Keys are checked against an in-memory table of hashes; a key made, revoked or rotated elsewhere
(the CLI, another gateway) is seen within ``refresh_interval`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import hookimpl
from gateway.admin_auth import ADMIN, allow, presented_key
from gateway.call import Call
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.jsonbody import read_object
from gateway.state import Gateway
from gateway.validate import ValidationError, positive
from plugins import auth_keys
from plugins.auth_keys import digest

ASK = "ask the gateway's admin for a key (multiverse keys create)"


@dataclass(frozen=True)
class Options:
    refresh_interval: float = field(
        default=0.5,
        metadata={
            "doc": "seconds between checks for keys made or revoked by the CLI or another gateway",
            "check": positive,
        },
    )


@dataclass(frozen=True, slots=True)
class Entry:
    identity: Identity
    expires_at: float | None
    revoked_at: float | None


def _day(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _named(entry: Entry) -> str:
    """A key as a refusal names it: made only for a refusal, not for every request."""
    return f"the API key '{entry.identity.name}' ({entry.identity.key_id})"


class Plugin:
    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.keys: dict[str, Entry] = {}
        self._version = -1
        self._admin_text: str | None = None
        self._admin_bytes = b""

    # -- keeping the table in memory ------------------------------------------------

    @hookimpl
    async def startup(self, gateway: Gateway) -> None:
        await gateway.registry.migrate(auth_keys.PLUGIN, auth_keys.MIGRATIONS)
        await self.refresh(gateway)
        gateway.every(self.options.refresh_interval, lambda: self.refresh(gateway), name="auth")

    async def refresh(self, gateway: Gateway, force: bool = False) -> None:
        """Reload the keys when any other connection committed to the database since the last look."""
        db = gateway.registry.db  # execute_fetchall: one call into aiosqlite's thread, where a cursor costs three
        found = list(await db.execute_fetchall("PRAGMA data_version"))
        version = int(found[0][0]) if found else 0
        if version == self._version and not force:
            return
        self._version = version
        rows = await db.execute_fetchall("SELECT * FROM auth_keys")
        self.keys = {r["key_hash"]: Entry(auth_keys.identity(r), r["expires_at"], r["revoked_at"]) for r in rows}

    # -- every request ----------------------------------------------------------------

    @hookimpl
    def authenticate(self, request: web.Request, gateway: Gateway) -> Identity:
        given = presented_key(request)
        if not given:
            raise GatewayError(
                401,
                "no API key: send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key) or "
                f"'X-API-Key: <key>'; {ASK}",
                code="missing_api_key",
            )
        try:
            presented = given.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            presented = b""
        admin = gateway.admin_key
        if admin is not self._admin_text:  # the config's admin key as bytes, encoded once (not every request)
            self._admin_text, self._admin_bytes = admin, admin.encode()
        if hmac.compare_digest(presented, self._admin_bytes):
            return ADMIN
        entry = self.keys.get(digest(presented))
        if entry is None:
            raise GatewayError(
                401,
                "this API key is not known here; check that it was copied whole (it starts with mvk-), or " + ASK,
                code="invalid_api_key",
            )
        if entry.revoked_at is not None:
            raise GatewayError(
                401, f"{_named(entry)} was revoked on {_day(entry.revoked_at)}; {ASK}", code="revoked_api_key"
            )
        if entry.expires_at is not None and entry.expires_at <= time.time():
            raise GatewayError(
                401, f"{_named(entry)} expired on {_day(entry.expires_at)}; ask the gateway's admin to issue a new one",
                code="expired_api_key",
            )  # fmt: skip
        return entry.identity

    @hookimpl
    def filter_models(self, identity: Any, models: list[str]) -> list[str] | None:
        if isinstance(identity, Identity) and identity.models is not None:
            return [m for m in models if m in identity.models]
        return None

    @hookimpl
    def before_request(self, call: Call) -> None:
        """Refuse what the key may not do; changes nothing, so explain (``call.dry_run``) gets the same answer."""
        caller = call.identity
        if not isinstance(caller, Identity):
            return
        if caller.role == "readonly":
            raise GatewayError(
                403,
                "a readonly key may list models and read status and stats, not send requests; ask for a user key",
                code="insufficient_role",
            )
        if not caller.may_use(call.requested_model):
            raise GatewayError(
                403,
                f"this key may not use model '{call.requested_model}'; it may use: {', '.join(caller.models or ())}",
                code="model_not_allowed",
                param="model",
            )

    # -- the admin API and the CLI ------------------------------------------------------

    @hookimpl
    def register_routes(self, gateway: Gateway) -> list[web.RouteDef]:
        return [
            web.post("/admin/keys", allow()(self.create_key)),
            web.get("/admin/keys", allow()(self.list_keys)),
            web.delete("/admin/keys/{key_id}", allow()(self.revoke_key)),
            web.post("/admin/keys/{key_id}/rotate", allow()(self.rotate_key)),
        ]

    @hookimpl
    def register_commands(self, subparsers: argparse._SubParsersAction[Any]) -> None:
        from plugins.auth_cli import add_commands

        add_commands(subparsers)

    async def create_key(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        body = await read_object(request)
        try:
            spec = auth_keys.spec(body)
        except ValidationError as exc:
            raise GatewayError(400, "; ".join(exc.problems), param=exc.problems[0].split(":")[0]) from None
        [(secret, listed)] = await self._write(gateway, auth_keys.create, [spec], (caller.key_id, caller.name))
        gateway.log.info("key_created", key_id=listed["id"], name=listed["name"], role=listed["role"])
        return web.json_response({"key": secret, **listed, "note": "the key is shown once: store it now"}, status=201)

    async def list_keys(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        keys = await asyncio.to_thread(auth_keys.listing, gateway.config.database_path)
        return web.json_response({"keys": keys, "count": len(keys)})

    async def revoke_key(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        key_id = request.match_info["key_id"]
        listed = await self._write(gateway, auth_keys.revoke, key_id, (caller.key_id, caller.name))
        if listed is None:
            raise _unknown(key_id)
        gateway.log.info("key_revoked", key_id=key_id)
        return web.json_response(listed)

    async def rotate_key(self, request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        key_id = request.match_info["key_id"]
        rotated = await self._write(gateway, auth_keys.rotate, key_id, (caller.key_id, caller.name))
        if rotated is None:
            raise _unknown(key_id, " or revoked (create a new key instead)")
        gateway.log.info("key_rotated", key_id=key_id)
        return web.json_response({"key": rotated[0], **rotated[1], "note": "the old secret no longer works"})

    async def _write(self, gateway: Gateway, operation: Any, *args: Any) -> Any:
        """Run a write on its own connection, off the event loop, then take the keys in at once."""
        result = await asyncio.to_thread(operation, Path(gateway.config.database_path), *args)
        await self.refresh(gateway, force=True)
        return result


def _unknown(key_id: str, also: str = "") -> GatewayError:
    return GatewayError(404, f"no key with id '{key_id}'{also}; GET /admin/keys lists them", param="key_id")
