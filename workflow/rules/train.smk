# SPACE training: one run per entry of `experiments` in params.yaml, on its dataset's store.
# The run directory keeps its checkpoint across an interrupted job, so a rerun resumes; only the summary
# written at the end is Snakemake's output. The checkpoint records the store and settings it was trained
# on: when either has changed (a dataset regenerated, a setting edited) --restart trains afresh instead of
# resuming, so a changed dataset or setting always trains a new model.


rule train:
    """Train SPACE (python -m space train); resumes from results/runs/<experiment>/checkpoints/last.pt when
    that was trained on the same store with the same settings, else starts afresh (--restart)."""
    input:
        lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
    output:
        "results/runs/{experiment}/train.json",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        run="results/runs/{experiment}",
        preset=lambda wc: config["experiments"][wc.experiment]["preset"],
        sets=lambda wc: set_flags(config["experiments"][wc.experiment].get("set", {})),
    threads: workflow.cores
    resources:
        gpu=1,
        mem_mb=8000,
    log:
        "logs/train/{experiment}.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space train --data {input} --out {params.run} --preset {params.preset} {params.sets} "
        "--set train.threads={threads} --restart --summary {output} --quiet 2> {log}"


rule train_runs:
    """Every enabled experiment of params.yaml, trained only (train_all also scores and pictures them)."""
    input:
        expand("results/runs/{experiment}/train.json", experiment=EXPERIMENTS),
