# The pipeline's one DAG. `snakemake --cores 2 train_all --configfile config/demo.yaml` is the CPU demo;
# `dvc repro` runs the same rules through dvc.yaml; `eval_all` scores every run (table 1) and draws it.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datagen.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        rules.data_all.input,
        rules.train_all.input,
        rules.eval_all.input,
