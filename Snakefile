# The pipeline's one DAG. `snakemake --cores 8 train_all`: every dataset generated, every experiment trained,
# scored (table 1) and pictured, and the summary table over them; with `--configfile config/demo.yaml` it is
# the CPU demo. `dvc repro` runs the same rules through dvc.yaml. Parts of it: data_all, train_runs, eval_all.

configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/datagen.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule train_all:
    """The whole DAG, data to figures and the summary table."""
    default_target: True
    input:
        rules.data_all.input,
        rules.train_runs.input,
        rules.eval_all.input,


rule all:
    """The same as train_all."""
    input:
        rules.train_all.input,
