# Datasets: one Zarr store per entry of `datasets` in params.yaml, with a contact sheet and a summary.
# With datagen.parts = N > 1 each dataset is N generator jobs, each writing every N-th shard into a part
# store (results/parts/, removed once merged), and one merge job that joins them: on a cluster the parts
# run as separate jobs (profiles/slurm, profiles/kubernetes). The merged store equals a one-job store.

rule room3d:
    """3D-Room scenes rendered with MuJoCo (paper, appendix E)."""
    output:
        gen_out(),
    wildcard_constraints:
        dataset="|".join(d for d in DATASETS if config["datasets"][d]["generator"] == "room3d") or "^$",
    params:
        objects=lambda wc: " ".join(map(str, config["datasets"][wc.dataset]["objects"])),
        splits=lambda wc: split_flags(config["datasets"][wc.dataset]["splits"]),
        seed=lambda wc: config["datasets"][wc.dataset]["seed"],
        scene=lambda wc: cli_flags(config["datasets"][wc.dataset].get("room3d", {})),
        shard_size=config["datagen"]["shard_size"],
        part=part_flag,
        staging=staging,
    threads: config["datagen"]["workers"]
    resources:
        mem_mb=lambda wc, threads: 1000 + 600 * threads,
    log:
        per_part("logs/datagen/{dataset}.log"),
    benchmark:
        per_part("benchmarks/datagen/{dataset}.tsv")
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen room3d {params.staging} --scratch --objects {params.objects} {params.splits} "
        "--seed {params.seed} --shard-size {params.shard_size} --workers {threads} {params.part} {params.scene} "
        "2> {log} && mv {params.staging} {output}"


rule atari:
    """Atari frames from agent rollouts, with object boxes from the RAM (paper, appendix E; issue 5)."""
    output:
        gen_out(),
    wildcard_constraints:
        dataset="|".join(d for d in DATASETS if config["datasets"][d]["generator"] == "atari") or "^$",
    params:
        games=lambda wc: " ".join(f"--game {g}" for g in config["datasets"][wc.dataset]["games"]),
        splits=lambda wc: split_flags(config["datasets"][wc.dataset]["splits"]),
        seed=lambda wc: config["datasets"][wc.dataset]["seed"],
        rollout=lambda wc: cli_flags(config["datasets"][wc.dataset].get("atari", {})),
        shard_size=config["datagen"]["shard_size"],
        part=part_flag,
        staging=staging,
    threads: config["datagen"]["workers"]
    resources:
        mem_mb=lambda wc, threads: 800 + 400 * threads,
    log:
        per_part("logs/datagen/{dataset}.log"),
    benchmark:
        per_part("benchmarks/datagen/{dataset}.tsv")
    conda:
        "../../envs/datagen.yaml"
    shell:
        "python -m datagen atari {params.staging} --scratch {params.games} {params.splits} --seed {params.seed} "
        "--shard-size {params.shard_size} --workers {threads} {params.part} {params.rollout} "
        "2> {log} && mv {params.staging} {output}"


if PARTS > 1:

    rule merge_parts:
        """Join a dataset's part stores into one complete store (python -m datagen merge)."""
        input:
            lambda wc: expand("results/parts/{dataset}/part{part}.zarr", dataset=wc.dataset, part=range(PARTS)),
        output:
            directory("results/data/{dataset}.zarr"),
        wildcard_constraints:
            dataset="|".join(DATASETS),
        log:
            "logs/datagen/{dataset}.merge.log",
        conda:
            "../../envs/datagen.yaml"
        shell:
            "python -m datagen merge {output} {input} 2> {log}"


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
        report("results/data/{dataset}.train.png", caption="../report/dataset.rst", category="1. Datasets",
               labels={"dataset": "{dataset}"}),
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
