# SPACE training: one run per seed of each entry of `experiments` in params.yaml, on its dataset's store,
# in results/runs/{experiment}/seeds/{seed}/. The run directory keeps its checkpoint across an interrupted
# job, so a rerun resumes; only the summary written at the end is Snakemake's output. The checkpoint
# records the store and settings it was trained on: when either has changed (a dataset regenerated, a
# setting edited) --restart trains afresh instead of resuming, so a changed dataset or setting always
# trains a new model. Seeds are separate jobs: they run side by side, or as separate cluster jobs.


rule train:
    """Train SPACE with one seed (python -m space train); resumes from the seed's checkpoints/last.pt when
    that was trained on the same store with the same settings, else starts afresh (--restart)."""
    input:
        lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
    output:
        "results/runs/{experiment}/seeds/{seed}/train.json",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
        seed=r"\d+",
    params:
        run="results/runs/{experiment}/seeds/{seed}",
        # the step and scores so far, rewritten as the run goes: DVC's live metrics (dvc.yaml)
        live="results/live/{experiment}.seed{seed}.json",
        preset=lambda wc: config["experiments"][wc.experiment]["preset"],
        # the experiment's settings, then this job's seed (its threads are in the shell command: a params
        # function that asks for them would need --cores under --report, --lint and -n)
        sets=lambda wc: set_flags({**config["experiments"][wc.experiment].get("set", {}), "train.seed": int(wc.seed)}),
    threads: lambda wc: workflow.cores  # a function: --report, --lint and -n need no --cores
    resources:
        gpu=1,
        mem_mb=8000,
    log:
        "logs/train/{experiment}.seed{seed}.log",
    benchmark:
        "benchmarks/train/{experiment}.seed{seed}.tsv"
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space train --data {input} --out {params.run} --preset {params.preset} {params.sets} "
        "--set train.threads={threads} "
        "--restart --summary {output} "
        "--live {params.live} "
        "--quiet 2> {log}"


rule combine_seeds_training:
    """The experiment's train.json (means over seeds, each seed's summary, seeds whose background did not
    split) and its mean metrics.csv and val.csv curves."""
    input:
        summaries=seed_paths("results/runs/{experiment}/seeds/{seed}/train.json"),
    output:
        summary="results/runs/{experiment}/train.json",
        metrics="results/runs/{experiment}/metrics.csv",
        val="results/runs/{experiment}/val.csv",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        metrics=lambda wc, input: " ".join(os.path.join(os.path.dirname(f), "metrics.csv") for f in input.summaries),
        val=lambda wc, input: " ".join(os.path.join(os.path.dirname(f), "val.csv") for f in input.summaries),
    log:
        "logs/train/{experiment}.seeds.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "(python -m space seeds {input.summaries} --out {output.summary} "
        "&& python -m space seeds {params.metrics} --out {output.metrics} "
        "&& python -m space seeds {params.val} --out {output.val} --allow-missing) 2> {log}"


rule train_runs:
    """Every enabled experiment of params.yaml, trained only (train_all also scores and pictures them)."""
    input:
        expand("results/runs/{experiment}/train.json", experiment=EXPERIMENTS),
