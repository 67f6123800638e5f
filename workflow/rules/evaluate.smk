# Evaluation: every trained run scored on its dataset's test split (python -m space evaluate), its
# decomposition figure (python -m space show) and curves (python -m space curves), and one table over all
# runs (python -m space summary).


rule evaluate:
    """Scores of table 1 (AP, count error, MSE) with a baseline, and the COCO files behind them."""
    input:
        summary="results/runs/{experiment}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
    output:
        metrics="results/runs/{experiment}/eval/test/metrics.json",
        detections="results/runs/{experiment}/eval/test/detections.json",
        ground_truth="results/runs/{experiment}/eval/test/ground_truth.json",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
        folder=lambda wc, output: os.path.dirname(output.metrics),
    threads: workflow.cores
    log:
        "logs/evaluate/{experiment}.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space evaluate --run {params.run} --data {input.data} --split test --out {params.folder} "
        "--quiet > /dev/null 2> {log}"


rule decomposition_figure:
    """Input, reconstruction, boxes, foreground, alpha, background and its components, 8 test frames."""
    input:
        summary="results/runs/{experiment}/train.json",
        data=lambda wc: f"results/data/{config['experiments'][wc.experiment]['dataset']}.zarr",
    output:
        "results/runs/{experiment}/eval/test/decomposition.png",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        run=lambda wc, input: os.path.dirname(input.summary),
    log:
        "logs/evaluate/{experiment}.figure.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space show --run {params.run} --data {input.data} --split test --out {output} 2> {log}"


rule curves:
    """Training loss and validation MSE against steps and wall time (figure 5's convergence panels)."""
    input:
        "results/runs/{experiment}/train.json",
    output:
        "results/runs/{experiment}/eval/curves.png",
    wildcard_constraints:
        experiment="|".join(EXPERIMENTS) or "^$",
    params:
        run=lambda wc, input: os.path.dirname(input[0]),
    log:
        "logs/evaluate/{experiment}.curves.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space curves {params.run} --out {output} 2> {log}"


rule summary:
    """One table (Markdown and JSON) over every run's test scores."""
    input:
        expand("results/runs/{experiment}/eval/test/metrics.json", experiment=EXPERIMENTS),
    output:
        markdown="results/summary.md",
        json="results/summary.json",
    log:
        "logs/evaluate/summary.log",
    conda:
        "../../envs/space.yaml"
    shell:
        "python -m space summary {input} --out-markdown {output.markdown} --out-json {output.json} 2> {log}"


rule eval_all:
    """Every enabled experiment trained, scored and pictured, and the table over them."""
    input:
        expand("results/runs/{experiment}/eval/test/metrics.json", experiment=EXPERIMENTS),
        expand("results/runs/{experiment}/eval/test/decomposition.png", experiment=EXPERIMENTS),
        expand("results/runs/{experiment}/eval/curves.png", experiment=EXPERIMENTS),
        "results/summary.md",
