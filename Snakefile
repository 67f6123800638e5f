# The pipeline's one DAG. `snakemake --cores 2 data_all --configfile config/demo.yaml` is the CPU demo;
# `dvc repro` runs the same rules through dvc.yaml. Training (train_all) and evaluation (eval_all) join
# this DAG with their issues; today it builds and checks the datasets.

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/datagen.smk"


rule all:
    default_target: True
    input:
        rules.data_all.input,
