"""``phaselens mode get|set``: show or change a running engine's colocated/split mode (its admin API).

The token comes from ``--token-file`` or the ``PHASELENS_ADMIN_TOKEN`` environment variable, the same as
``phaselens serve``'s; :class:`AdminClient` is the HTTP side, also used by ``advisor/apply.py``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from phaselens.cli import FiniteRange

TOKEN_ENV = "PHASELENS_ADMIN_TOKEN"


class AdminError(RuntimeError):
    """The engine refused or failed an admin call; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class AdminClient:
    """Calls ``/admin/mode`` of an engine at ``base_url`` with a bearer token."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"engine URL {base_url!r}: expected http://host:port")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def get_mode(self) -> dict[str, Any]:
        return self._call("GET", "/admin/mode")

    def set_mode(self, mode: str, prefill: int | None = None, decode: int | None = None,
                 health_timeout_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"mode": mode}
        if prefill is not None:
            body["prefill"] = prefill
        if decode is not None:
            body["decode"] = decode
        if health_timeout_s is not None:
            body["health_timeout_s"] = health_timeout_s
        return self._call("POST", "/admin/mode", body)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", auth=False)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              auth: bool = True) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
            except json.JSONDecodeError:
                err = None
            if isinstance(err, dict) and isinstance(err.get("error"), dict):
                if path == "/health" and "status" in err:  # 503 unavailable still has the body
                    return err
                raise AdminError(f"HTTP {exc.code}: {err['error'].get('message')}", exc.code,
                                 err["error"].get("code")) from None
            if isinstance(err, dict) and path == "/health":
                return err
            raise AdminError(f"HTTP {exc.code}: {raw[:200].decode(errors='replace')}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(f"cannot reach the engine at {self.base_url}: {reason}") from None


def read_token(token_file: str | None, param_hint: str = "--token-file") -> str:
    """The admin token from ``token_file``, else from ``PHASELENS_ADMIN_TOKEN``; BadParameter if neither."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {token_file!r}: {exc.strerror}",
                                     param_hint=param_hint) from None
        if not token:
            raise click.BadParameter(f"{token_file!r} is empty", param_hint=param_hint)
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise click.BadParameter(f"no admin token: give {param_hint} or set {TOKEN_ENV}",
                                 param_hint=param_hint)
    return token


def _client(engine: str, token_file: str | None) -> AdminClient:
    token = read_token(token_file)
    try:
        return AdminClient(engine, token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine") from None


def describe(state: dict[str, Any]) -> str:
    """One line per pool and worker, for the terminal."""
    lines = [f"mode: {state['mode']}  (prefill {state['prefill']}, decode {state['decode']}, "
             f"colocated {state['colocated']})"]
    for w in state.get("workers", []):
        lines.append(f"  {w['id']}: {w['role']}{'' if w['alive'] else ' (dead)'}, {w['requests']} in flight")
    kv = state.get("kv_transfers") or {}
    if kv.get("count"):
        lines.append(f"  KV hand-offs: {kv['count']}, {kv['bytes'] / 2**20:.1f} MiB, blocks moved "
                     f"{kv['blocks_moved']}, already cached {kv['blocks_cached']}")
    return "\n".join(lines)


_engine_opt = click.option("--engine", default="http://127.0.0.1:8000", show_default=True,
                           help="The engine's base URL.")
_token_opt = click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                          help=f"File holding the admin token (default: ${TOKEN_ENV}).")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print the engine's JSON answer.")


@click.group()
def mode() -> None:
    """Show or change the engine's colocated/split mode."""


@mode.command("get")
@_engine_opt
@_token_opt
@_json_opt
def get_cmd(engine: str, token_file: str | None, as_json: bool) -> None:
    """Show the engine's mode and worker pools."""
    try:
        state = _client(engine, token_file).get_mode()
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(state, indent=2) if as_json else describe(state))


@mode.command("set")
@click.argument("new_mode", metavar="MODE", type=click.Choice(["colocated", "split"]))
@click.option("--prefill", type=click.IntRange(min=1), default=None, help="Prefill workers (split).")
@click.option("--decode", type=click.IntRange(min=1), default=None, help="Decode workers (split).")
@click.option("--health-timeout", type=FiniteRange(min=0.1), default=None,
              help="Seconds the new mode's workers have to pass their health check (default: the server's).")
@_engine_opt
@_token_opt
@_json_opt
def set_cmd(new_mode: str, prefill: int | None, decode: int | None, health_timeout: float | None,
            engine: str, token_file: str | None, as_json: bool) -> None:
    """Change the mode: `set split --prefill 1 --decode 1`, or `set colocated`."""
    if new_mode == "split" and (prefill is None or decode is None):
        raise click.BadParameter("split needs --prefill N and --decode N", param_hint="--prefill/--decode")
    if new_mode == "colocated" and (prefill is not None or decode is not None):
        raise click.BadParameter("--prefill/--decode apply to split only", param_hint="--prefill/--decode")
    client = _client(engine, token_file)
    try:
        state = client.set_mode(new_mode, prefill, decode, health_timeout)
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(state, indent=2) if as_json else describe(state))
