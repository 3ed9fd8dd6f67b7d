"""One message at a site: its config, run, keys, ledger and audit log, read once and passed down.

:func:`open_session` reads what every handler needs before any data: the run config, where the
site is and its ``site.toml``, the run key the ledger charges under and the server round. The
privacy ledger is opened once per message, on first use, and that one object
serves the budget check, the charge, the replay lookup, the reply's ε and the audit line; what
must see other processes' charges re-reads it (:meth:`PrivacyLedger.check_budget` and
:meth:`~PrivacyLedger.charge_all` re-read and verify it under its lock, and a charged-once lookup
re-reads it under the site's cache lock, :mod:`client.charged`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from flwr.app import Context, Message

from biofp_core.audit import AuditLog
from biofp_core.privacy.ledger import PrivacyLedger
from biofp_core.protocol import CONFIG_KEY, RUN_KEY, RUN_KEY_PATTERN, SERVER_ROUND, RunConfig
from biofp_core.site import SiteConfig
from client.site_data import SiteRef, locate_site, site_config


def message_run_key(message: Message, context: Context) -> str:
    """The run the ledger charges under: the server's run key, else Flower's run id."""
    config = message.content.config_records.get(CONFIG_KEY)
    value = config.get(RUN_KEY) if config is not None else None
    if isinstance(value, str) and re.match(RUN_KEY_PATTERN, value):
        return value
    return str(context.run_id)


def message_server_round(message: Message) -> int:
    """The server round a message names (0 when it names none)."""
    config = message.content.config_records.get(CONFIG_KEY)
    value = config.get(SERVER_ROUND, 0) if config is not None else 0
    return int(value) if isinstance(value, int | float) else 0


@dataclass
class SiteSession:
    """What one message's handler knows about its site and run."""

    site: SiteConfig
    where: SiteRef
    run: RunConfig
    run_key: str
    server_round: int

    @cached_property
    def state_dir(self) -> Path:
        return self.site.resolved_state_dir()

    @cached_property
    def ledger(self) -> PrivacyLedger:
        """The site's ledger, opened once for this message. Reading it (ε of a refusal, of an
        audit line) does not verify it; every charge and budget check does, under its lock."""
        return PrivacyLedger.at(self.state_dir)

    @cached_property
    def audit(self) -> AuditLog:
        return AuditLog.at(self.state_dir)

    @property
    def delta(self) -> float:
        return self.site.privacy.delta

    def epsilon(self) -> float:
        """ε the site's whole ledger has spent, at the site's δ."""
        return self.ledger.epsilon(delta=self.delta)

    def spent(self) -> tuple[float, float]:
        """(ε spent, δ) of the site, as a refusal reports them."""
        return self.epsilon(), self.delta


def open_session(message: Message, context: Context) -> SiteSession:
    """The session of `message`: run config parsed, site located and its config read.

    Raises
    ------
    ConfigError, ValidationError
        The run config, the node config or the site's ``site.toml`` is invalid.
    """
    run = RunConfig.from_run_config(context.run_config)
    where = locate_site(context.node_config, sim_sites=run.sim_sites)
    return SiteSession(
        site=site_config(where),
        where=where,
        run=run,
        run_key=message_run_key(message, context),
        server_round=message_server_round(message),
    )
