# Datasets: one Zarr store per entry of `datasets` in params.yaml, with a contact sheet and a summary.


rule room3d:
    """3D-Room scenes rendered with MuJoCo (paper, appendix E)."""
    output:
        directory("results/data/{dataset}.zarr"),
    wildcard_constraints:
        dataset="|".join(d for d in DATASETS if config["datasets"][d]["generator"] == "room3d") or "^$",
    params:
        objects=lambda wc: " ".join(map(str, config["datasets"][wc.dataset]["objects"])),
        splits=lambda wc: split_flags(config["datasets"][wc.dataset]["splits"]),
        seed=lambda wc: config["datasets"][wc.dataset]["seed"],
        scene=lambda wc: cli_flags(config["datasets"][wc.dataset].get("room3d", {})),
        shard_size=config["datagen"]["shard_size"],
    threads: config["datagen"]["workers"]
    resources:
        mem_mb=lambda wc, threads: 1000 + 600 * threads,
    log:
        "logs/datagen/{dataset}.log",
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen room3d {output} --objects {params.objects} {params.splits} --seed {params.seed} "
        "--shard-size {params.shard_size} --workers {threads} {params.scene} 2> {log}"


rule atari:
    """Atari frames from agent rollouts, with object boxes from the RAM (paper, appendix E; issue 5)."""
    output:
        directory("results/data/{dataset}.zarr"),
    wildcard_constraints:
        dataset="|".join(d for d in DATASETS if config["datasets"][d]["generator"] == "atari") or "^$",
    params:
        games=lambda wc: " ".join(f"--game {g}" for g in config["datasets"][wc.dataset]["games"]),
        splits=lambda wc: split_flags(config["datasets"][wc.dataset]["splits"]),
        seed=lambda wc: config["datasets"][wc.dataset]["seed"],
        rollout=lambda wc: cli_flags(config["datasets"][wc.dataset].get("atari", {})),
        shard_size=config["datagen"]["shard_size"],
    threads: config["datagen"]["workers"]
    resources:
        mem_mb=lambda wc, threads: 800 + 400 * threads,
    log:
        "logs/datagen/{dataset}.log",
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen atari {output} {params.games} {params.splits} --seed {params.seed} "
        "--shard-size {params.shard_size} --workers {threads} {params.rollout} 2> {log}"


rule inspect_dataset:
    """Validate a store and summarise it as JSON (frames, objects per frame, categories)."""
    input:
        "results/data/{dataset}.zarr",
    output:
        "results/data/{dataset}.summary.json",
    log:
        "logs/datagen/{dataset}.inspect.log",
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen inspect {input} --json > {output} 2> {log}"


rule show_dataset:
    """A contact sheet of training frames with their ground-truth boxes, to check by eye."""
    input:
        "results/data/{dataset}.zarr",
    output:
        "results/data/{dataset}.train.png",
    log:
        "logs/datagen/{dataset}.show.log",
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen show {input} --split train --out {output} 2> {log}"


rule data_all:
    """Every dataset of params.yaml, checked and pictured."""
    input:
        expand("results/data/{dataset}.zarr", dataset=DATASETS),
        expand("results/data/{dataset}.summary.json", dataset=DATASETS),
        expand("results/data/{dataset}.train.png", dataset=DATASETS),
