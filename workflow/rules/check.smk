# Stage 0: the pre-flight checks (`bestie check`, bestie/check.py). Every stage's rule takes the report
# as an input (dataset_marker()), so none starts before the data and the config passed. It reruns when
# the dataset section, its lists and folders, or the GPU count change (check_params(): changes that make
# every stage stale anyway), reads headers and small files only, and lists every fault at once
# (results/<run>/logs/check.log) before any training. CHECK_CONFIG (common.smk) is not a param on purpose.


rule check:
    input:
        demo_marker(),
    output:
        report=CHECK_REPORT,
    params:
        checked=lambda wc: check_params(),
        launch=launcher(0),
    log:
        f"{LOGS}/check.log",
    threads: 1
    resources:
        gpu=infer_gpus(),  # runs where the GPU jobs run, so that the GPU check sees their devices
        mem_mb=4000,
        runtime=30,
    shell:
        "BESTIE_RULE={rule} {params.launch} check --config {CHECK_CONFIG:q} --out {output.report:q} > {log:q} 2>&1"
