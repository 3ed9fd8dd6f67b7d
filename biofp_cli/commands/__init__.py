"""CLI subcommand groups, one module per user (site IT, researchers, coordinators)."""
