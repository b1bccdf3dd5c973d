"""The house's plumbing, below every stage: what train/, serve/, synthdata/, distill/ and bench/ all need and none
of them owns. Imports point here and never out: this package imports no stage.

    artifacts     atomic writes, published directories, manifests read with their damage named, output locks,
                  the one fsync'ed append-only ledger (JSON lines keyed by what was done)
    console       the project's base error (ChorusError), logging, and `exit_on`: how every CLI ends
    ray_session   the one door to Ray: a private local Ray (token auth, loopback, no telemetry) or a named cluster
"""
