"""`python -m biofp_cli` is the `biofp` command."""

from biofp_cli.cli import main

main()
