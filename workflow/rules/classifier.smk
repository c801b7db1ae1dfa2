# Stage 1: image-level classifiers. `pam` (Peak Attention Module) gives the peak points; `dense`
# (plain CAM head) gives the dense CAMs that the WSSS stage refines (METHOD.md sections 1-2).
# With `classifier_<kind>.ensemble_seeds`, train_classifier_member trains one classifier per seed instead
# and make_cams averages their CAMs.

_TRAIN_CLASSIFIER = (
    "BESTIE_RULE={rule} {params.launch} train-classifier --params {params.p:q} --dataset {params.ds:q} "
    "--out-checkpoint {output.checkpoint:q} --out-log {output.log:q} {params.device} > {log:q} 2>&1"
)


rule train_classifier:
    input:
        dataset_marker(),
    output:
        checkpoint=f"{OUT}/classifier/{{kind}}.pt",
        log=f"{OUT}/classifier/{{kind}}_log.jsonl",
    params:
        p=lambda wc: stage_params(f"classifier_{wc.kind}"),
        ds=lambda wc: dataset_params(),
        launch=launcher(train_gpus()),
        device=device_flag(train_gpus()),
    log:
        f"{LOGS}/train_classifier_{{kind}}.log",
    benchmark:
        f"{BENCH}/train_classifier_{{kind}}.tsv"
    threads: classifier_threads()
    resources:
        gpu=train_gpus(),
        mem_mb=8000,
        runtime=600,
    shell:
        _TRAIN_CLASSIFIER


rule train_classifier_member:
    input:
        dataset_marker(),
    output:
        checkpoint=f"{OUT}/classifier/{{kind}}_seed{{seed}}.pt",
        log=f"{OUT}/classifier/{{kind}}_seed{{seed}}_log.jsonl",
    params:
        p=lambda wc: stage_params(f"classifier_{wc.kind}", seed=int(wc.seed)),
        ds=lambda wc: dataset_params(),
        launch=launcher(train_gpus()),
        device=device_flag(train_gpus()),
    log:
        f"{LOGS}/train_classifier_{{kind}}_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/train_classifier_{{kind}}_seed{{seed}}.tsv"
    threads: classifier_threads()
    resources:
        gpu=train_gpus(),
        mem_mb=8000,
        runtime=600,
    shell:
        _TRAIN_CLASSIFIER
