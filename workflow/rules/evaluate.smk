# Evaluation: every trained run (each seed of each experiment) scored on its dataset's test split (python -m
# space evaluate) and its decomposition figure (python -m space show), of the checkpoint the experiment names
# or, with several, of the one chosen on validation (python -m space select); per experiment, the scores combined
# over seeds (python -m space seeds) and the seeds' curves in one figure (python -m space curves); and one
# table over all experiments (python -m space summary).


rule select_checkpoint:
    """Where an experiment lists two or more `checkpoints`: each scored on the seed's validation split
    (refined where the experiment says `refine: true`, as its test scores will be), and the one with the
    best `checkpoint_by` score chosen; the test scores, figure and latents are of that one."""
    input:
        summary="results/runs/{experiment}/seeds/{seed}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
    output:
        SELECTION,
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
        seed=r"\d+",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
        folder=lambda wc, output: os.path.dirname(output[0]),
        candidates=lambda wc: " ".join(checkpoint_candidates(wc)),
        by=lambda wc: config["experiments"][wc.experiment].get("checkpoint_by", "ap50"),
        refine=refine_flag,
    threads: lambda wc: workflow.cores  # a function: --report, --lint and -n need no --cores
    log:
        "logs/evaluate/{experiment}.seed{seed}.select.log",
    benchmark:
        "benchmarks/evaluate/{experiment}.seed{seed}.select.tsv"
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space select --run {params.run} --data {input.data} --split val --candidates {params.candidates} "
        "--by {params.by} --out {params.folder} {params.refine}--quiet > /dev/null 2> {log}"


rule evaluate:
    """Scores of table 1 (AP, count error, MSE) with a baseline, and the COCO files behind them, of one
    seed's checkpoint: by default the best (by validation AP; the last where the run never validated), or
    the experiment's `checkpoints` choice; with the experiment's `refine: true`, of the z_pres decisions
    refined by the model's own objective."""
    input:
        summary="results/runs/{experiment}/seeds/{seed}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
        selection=checkpoint_selection,
    output:
        metrics="results/runs/{experiment}/eval/seeds/{seed}/test/metrics.json",
        detections="results/runs/{experiment}/eval/seeds/{seed}/test/detections.json",
        ground_truth="results/runs/{experiment}/eval/seeds/{seed}/test/ground_truth.json",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
        seed=r"\d+",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
        folder=lambda wc, output: os.path.dirname(output.metrics),
        checkpoint=checkpoint_flag,
        refine=refine_flag,
    threads: lambda wc: workflow.cores  # a function: --report, --lint and -n need no --cores
    log:
        "logs/evaluate/{experiment}.seed{seed}.log",
    benchmark:
        "benchmarks/evaluate/{experiment}.seed{seed}.tsv"
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space evaluate --run {params.run} --data {input.data} --split test --out {params.folder} "
        "{params.checkpoint}{params.refine}--quiet > /dev/null 2> {log}"


rule decomposition_figure:
    """Input, reconstruction, boxes, foreground, alpha, background and its components, 8 test frames, of the
    checkpoint the scores are of (with the experiment's `refine: true`, of the refined z_pres decisions)."""
    input:
        summary="results/runs/{experiment}/seeds/{seed}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
        selection=checkpoint_selection,
    output:
        report("results/runs/{experiment}/eval/seeds/{seed}/test/decomposition.png", caption="../report/decomposition.rst",
               category="3. Decompositions", labels={"experiment": "{experiment}", "seed": "{seed}"}),
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
        seed=r"\d+",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
        checkpoint=checkpoint_flag,
        refine=refine_flag,
    log:
        "logs/evaluate/{experiment}.seed{seed}.figure.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space show --run {params.run} --data {input.data} --split test --out {output} {params.checkpoint}"
        "{params.refine}2> {log}"


rule encode:
    """The run's latents on the test split (python -m space encode), of the checkpoint the scores are of:
    per frame and cell z_pres, box, z_depth, z_what, per background component z^m and z^c, a Zarr store
    for xarray and RL work."""
    input:
        summary="results/runs/{experiment}/seeds/{seed}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
        selection=checkpoint_selection,
    output:
        directory("results/runs/{experiment}/latents/seeds/{seed}/test.zarr"),
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
        seed=r"\d+",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
        checkpoint=checkpoint_flag,
    threads: lambda wc: workflow.cores  # a function: --report, --lint and -n need no --cores
    log:
        "logs/evaluate/{experiment}.seed{seed}.encode.log",
    benchmark:
        "benchmarks/evaluate/{experiment}.seed{seed}.encode.tsv"
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space encode --run {params.run} --data {input.data} --split test --out {output} "
        "{params.checkpoint}--quiet > /dev/null 2> {log}"


rule combine_seeds_scores:
    """The experiment's test scores: the mean over seeds of each score, its spread, and each seed's. Made
    once every seed is scored and pictured, so this one file stands for the experiment's evaluation (DVC's
    evaluate stage asks for it)."""
    input:
        scores=seed_paths("results/runs/{experiment}/eval/seeds/{seed}/test/metrics.json"),
        figures=seed_paths("results/runs/{experiment}/eval/seeds/{seed}/test/decomposition.png"),
    output:
        "results/runs/{experiment}/eval/test/metrics.json",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    log:
        "logs/evaluate/{experiment}.seeds.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space seeds {input.scores} --out {output} 2> {log}"


rule curves:
    """Training loss, validation MSE against steps and wall time (figure 5's convergence panels) and
    validation AP50, one line per seed."""
    input:
        seed_paths("results/runs/{experiment}/seeds/{seed}/train.json"),
    output:
        report("results/runs/{experiment}/eval/curves.png", caption="../report/curves.rst", category="2. Training",
               labels={"experiment": "{experiment}"}),
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        runs=lambda wc, input: " ".join(os.path.dirname(f) for f in input),
        labels=lambda wc: " ".join(f"seed{s}" for s in SEEDS[wc.experiment]),
    log:
        "logs/evaluate/{experiment}.curves.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space curves {params.runs} --labels {params.labels} --out {output} 2> {log}"


rule summary:
    """One table (Markdown and JSON) over every experiment's test scores (means over its seeds)."""
    input:
        expand("results/runs/{experiment}/eval/test/metrics.json", experiment=EXPERIMENTS),
    output:
        markdown="results/summary.md",
        json="results/summary.json",
        tsv=report("results/summary.tsv", caption="../report/summary.rst", category="4. Scores"),
    log:
        "logs/evaluate/summary.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space summary {input} --out-markdown {output.markdown} --out-json {output.json} --out-tsv {output.tsv} "
        "2> {log}"


rule eval_all:
    """Every enabled experiment trained, scored and pictured (each seed), and the table over them."""
    input:
        expand("results/runs/{experiment}/eval/test/metrics.json", experiment=EXPERIMENTS),
        every_seed("results/runs/{experiment}/eval/seeds/{seed}/test/decomposition.png"),
        expand("results/runs/{experiment}/eval/curves.png", experiment=EXPERIMENTS),
        "results/summary.md",


rule latents_all:
    """Every enabled experiment's latents on its test split, each seed (not part of train_all)."""
    input:
        every_seed("results/runs/{experiment}/latents/seeds/{seed}/test.zarr"),

