"""`biofp certs ...`: the federation's CA, the SuperLink certificate and SuperNode key pairs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

certs_app = typer.Typer(
    no_args_is_help=True, help="Make the federation's certificates and SuperNode keys."
)
console = Console(markup=False)  # paths and [sections] as is


@certs_app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="folder for ca.crt, ca.key, server.crt/.key"),
    server_name: str = typer.Option(..., "--server-name", help="host name sites dial"),
    days: int = typer.Option(397, "--days", min=1, help="server certificate validity"),
    ca_days: int = typer.Option(3650, "--ca-days", min=1, help="CA validity"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """A new CA and a SuperLink TLS certificate for HOST (plus localhost, 127.0.0.1, ::1)."""
    from biofp_core.fsutil import check_output_dir

    check_output_dir(out, what="certificate folder")
    from biofp_cli.certs import init_certificates

    files = init_certificates(
        out, server_name=server_name, ca_days=ca_days, server_days=days, force=force
    )
    console.print(f"CA certificate (give to every site): {files.ca_cert}")
    console.print(f"CA key (keep offline, mode 0600):    {files.ca_key}")
    console.print(f"server certificate and key:          {files.server_cert}, {files.server_key}")


@certs_app.command("server")
def server(
    out: Path = typer.Option(..., "--out", help="folder holding ca.crt and ca.key"),
    server_name: str = typer.Option(..., "--server-name", help="host name sites dial"),
    days: int = typer.Option(397, "--days", min=1, help="certificate validity"),
) -> None:
    """Issue a new SuperLink certificate and key from the existing CA (rotation)."""
    from biofp_core.fsutil import check_output_dir

    check_output_dir(out, what="certificate folder")
    from biofp_cli.certs import issue_server_certificate

    cert, key = issue_server_certificate(out, server_name=server_name, days=days)
    console.print(f"new server certificate and key: {cert}, {key}")
    console.print("restart the SuperLink (biofp server start) to use them")


@certs_app.command("node")
def node(
    out: Path = typer.Option(..., "--out", help="folder for SITE.key and SITE.pub"),
    name: str = typer.Option(..., "--name", help="the site's name"),
    force: bool = typer.Option(False, "--force", help="replace an existing key pair"),
) -> None:
    """A SuperNode key pair (EC P-384, OpenSSH): SITE.key stays, SITE.pub goes to coordinator."""
    from biofp_core.fsutil import check_output_dir

    check_output_dir(out, what="certificate folder")
    from biofp_cli.certs import node_keypair

    pair = node_keypair(out, name=name, force=force)
    console.print(f"private key (stays at the site, mode 0600): {pair.private_key}")
    console.print(f"public key (send to the coordinator):       {pair.public_key}")
    console.print(f"fingerprint (read it to the coordinator):   {pair.fingerprint}")


@certs_app.command("show")
def show(path: Path = typer.Argument(..., help="a .crt, or a SuperNode .pub/.key file")) -> None:
    """Names and validity of a certificate, or the fingerprint of a SuperNode key."""
    from biofp_cli.certs import (
        certificate_names,
        load_certificate,
        load_node_key,
        load_node_public_key,
        ssh_fingerprint,
    )

    text = path.read_bytes() if path.is_file() else b""
    if b"BEGIN CERTIFICATE" in text:
        cert = load_certificate(path)
        console.print(f"subject: {cert.subject.rfc4514_string()}")
        console.print(f"issuer:  {cert.issuer.rfc4514_string()}")
        console.print(f"names:   {', '.join(certificate_names(cert)) or '-'}")
        console.print(f"valid:   {cert.not_valid_before_utc:%Y-%m-%d} .. "
                      f"{cert.not_valid_after_utc:%Y-%m-%d} UTC")  # fmt: skip
        return
    if b"PRIVATE KEY" in text:
        public = load_node_key(path).public_key()
    else:
        public = load_node_public_key(path)
    console.print(f"{ssh_fingerprint(public)}  {path}")
