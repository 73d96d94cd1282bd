"""The path from an experiment config to a table cell, in layers that import downwards only:

    paper       the paper's tables (its numbers, rows, columns, metrics)
    metrics     the one reader of a run's metrics.csv
    configs     config folders, resolved configs, schedules, identities, row rules
    records     one JSON record per finished run: build, check, write, load
    imports     runs made elsewhere (../shared/runs) as records
    launch      processes K at a time per device (slots, jobs)
    timing      a few timed steps per config: the dry run's estimate
    run         one run of a sweep: fit, test, markers, its record
    slurm       a sweep as a SLURM array job
    sweep       every (config, seed) of a folder: plan, run, continue
    tables      the paper's tables filled from records and run folders
    plots       the report's PNGs
    report      RESULTS.md: the tables, the list of runs
    status      where a sweep stands

Below them, outside the package: :mod:`lit_divnorm.runs` (run folders and their markers),
:mod:`lit_divnorm.stopping` (signals) and :mod:`lit_divnorm.provenance` (machine and code).
"""
