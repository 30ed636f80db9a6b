"""The paper's analyses (SPEC section 5), each a module with an importable function and a
command line that writes its numbers as JSON next to its PNG figures.

    python -m analysis.mutual_information --data-dir DATA --out OUT        # ground-truth MI
    python -m analysis.attention_accuracy --run TWIN=RUN --run DARE=RUN --out OUT
    python -m analysis.retrieval --run DARE=RUN --run TWIN=RUN --baseline random --out OUT
    python -m analysis.gradients --run RUN_OF_twin_observe_grad --out OUT
    python -m analysis.discriminability --run DARE=RUN --run "DARE w/o TR=RUN" --out OUT
    python -m analysis.training_curves --run TWIN=RUN --run DARE=RUN --out OUT
    python -m analysis.efficiency --run DARE=RUN --run DARE-half=RUN --run TWIN=RUN --out OUT
    python -m analysis.table --run RUN --run RUN --out OUT                   # Table 1
    python -m analysis.paired_gap --pair LABEL:A=RUN,B=RUN --out OUT         # seed-paired gaps
    python -m analysis.seed_summary ROOT --out OUT    # mean ± std of per-seed analyses
    python -m analysis.log_stats FILE [FILE ...]      # SPEC 5b statistics of raw logs

RUN is a run directory of `python -m dare_jax.main`; analyses that need the model restore its
best Orbax checkpoint (`analysis.common.load_run`). Bad input ends with `error: ...` naming the
file or field and exit code 2. Shared helpers: `analysis.common`.
"""
