# BESTIE weakly-supervised instance segmentation workflow.
#
#   snakemake --cores all                                  # the embedded demo (config.yaml)
#   snakemake --cores all --configfile workflow/presets/coco128-voc.yaml
#   snakemake --cores all --resources gpu=4 --configfile my_voc.yaml
#   snakemake --profile workflow/profiles/slurm --configfile my_voc.yaml
#
# Every output lies under results/<run>/ (config key `run`), so runs with different names never touch
# each other's files. The rules live in workflow/rules/, one file per stage; helpers in common.smk.

from snakemake.utils import min_version

min_version("8.0")


# config.yaml (the embedded demo) applies only when no --configfile is given: a preset or a user's
# config is complete on its own and never inherits demo values.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/check.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/classifier.smk"
include: "workflow/rules/cams.smk"
include: "workflow/rules/wsss.smk"
include: "workflow/rules/bestie.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/maskrcnn.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
