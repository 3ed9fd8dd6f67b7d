"""Fingerprints out of a site: compute, pseudonymise, release under a policy, read back.

The path of a release (docs/privacy.md)::

    window store + model ──► compute.window_fingerprints ──► FingerprintTable (raw ids, in memory)
        ──► release.prepare_release: record means, clipping, Gaussian noise, pseudonyms
        ──► release.commit_release: ledger charge, Parquet bytes, file, audit line

Modules: `policy` (ReleasePolicy, noise calibration), `pseudonyms` (the site's HMAC key),
`table` (FingerprintTable, record means), `compute` (model inference, imports torch), `release`,
`parquet` (the file format and its checks). This package imports nothing heavy itself, so the site
config can use `policy` without loading torch.
"""
