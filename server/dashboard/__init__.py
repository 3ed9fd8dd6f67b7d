"""The coordinator's live dashboard: a read-only web page over run directories.

``biofp dashboard --runs DIR`` (or ``--dashboard`` of ``biofp simulate`` / ``biofp server start``)
serves three pages: every run with its status and progress, one run live (sites x rounds, losses,
ε per site, bytes, wall time, config, report), and every site across runs. It reads only what the
server writes into a run directory (:mod:`server.dashboard.runs`), serves its scripts from this
package (uPlot vendored under ``static/vendor``; no CDN), binds loopback by default and needs a
token for any other bind (:mod:`server.dashboard.serve`). It imports neither Flower nor client/.
"""
