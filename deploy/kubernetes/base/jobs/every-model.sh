# Runs `vigil ARGS... --model M` for every model in the registry ($VIGIL_REGISTRY), as the drift and
# quality CronJobs do: `sh every-model.sh drift run --last 24h`.
#
# Exit codes 3 (drift, or quality degraded) and 4 (too few rows) are verdicts, not failures: the
# service and the alerts take them from the store. Any other non-zero exit fails the Job, after every
# model had its run, and so does a registry with no model in it.
set -u
status=0
found=0
for dir in "${VIGIL_REGISTRY:?VIGIL_REGISTRY names the registry}"/*/; do
  [ -d "$dir" ] || continue
  model=${dir%/}
  model=${model##*/}
  found=1
  vigil "$@" --model "$model"
  code=$?
  case $code in
    0 | 3 | 4) ;;
    *) echo "vigil $* --model $model failed with exit $code" >&2; status=1 ;;
  esac
done
if [ "$found" = 0 ]; then
  echo "no model registered in $VIGIL_REGISTRY" >&2
  exit 1
fi
exit "$status"
