"""The one orchestrator: a study is a profile (bench/profiles/<name>.json) run by one resumable job.

    python -m bench.study --profile wiki --out studies/wiki          # the committed CPU study (~4 h)
    python -m bench.pipeline                                         # the main job: the profile `main`

Phases, each resumable, each followed by a (partial) report when the profile is long:
    data        corpus -> tokenizer + token shards (train.data.prepare_dataset); a calibration profile generates its
                corpus (bench.science.calibration: an order-2 Markov source) and computes its Bayes floor first
    gate        (profiles with gate_epochs) a few runs that check the regime shows the paper's effects at all: the
                largest size beats the smallest, the standard recipe overfits in epochs; a failed gate stops the
                study (its report says why) unless --past-gate
    search      per model size N: the same coordinate descent for both recipes (train.search: the regularized
                recipe searches epochs, lr and wd; the standard one epochs and lr at wd 0.1), or the profile's
                fixed settings when it does not search
    members     per N: 3 seeds (`seeds`) at both optima, and the ensemble's members (K = 1..k_max seeds at the
                joint recipe, 2x epochs and 0.5x wd of the single-model optimum, or at the optimum itself)
    ensembles   per N: validation loss of every K-subset of the ensemble's members (logit average)
    budgets     the data law: at each smaller budget D both recipes searched again, 3 seeds at each optimum
    serve       the members packed into one model behind the Ray Serve endpoint, checked with real requests
    distill     synthetic tokens from the ensemble (and from `self_teachers` single members), a budget fixed
                before the run so no synthetic window is used twice; students on real + synthetic tokens
                (`student_seeds` seeds), and the control: the same student recipe on real data only, same steps
    downstream  zero-shot accuracy (task files in --eval-dir, and a held-out next-word task)

Training goes through train/'s ledgers (train.search.train_ledgered), so a killed study continues where it
stopped and a finished run is never repeated; every evaluation is cached in OUT/evals.jsonl. What was measured
is collected in OUT/results.json; the analysis (bench.science.analysis, over an EvaluationTable built from it) and the
report (bench.science.report) are computed from that file alone: `--report-only` rewrites them without training.
"""
