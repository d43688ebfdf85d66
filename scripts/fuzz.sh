#!/usr/bin/env bash
# Fuzzes remus's decoders with cargo-fuzz (libFuzzer, AddressSanitizer,
# debug assertions and overflow checks on): each target in fuzz/ runs for
# a set time, one after the other, one process at a time, starting from
# its committed corpus in fuzz/corpus/TARGET; then a table per target.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   SECONDS per target (default 60);
#                                            inputs that add coverage are
#                                            merged into fuzz/corpus/
#   scripts/fuzz.sh --smoke                  10 s per target, corpus left
#                                            as it is (what CI runs)
#   scripts/fuzz.sh --seed                   regenerates the seed inputs
#                                            (fuzz/examples/gen_corpus.rs)
#                                            and merges them into the corpus
#   scripts/fuzz.sh --cmin [TARGET...]       minimizes the committed corpus
#                                            (cargo fuzz cmin)
#
# Exits 1 if any target crashed, hung (10 s on one input) or ran out of
# memory (2 GB); the failing inputs are under target/fuzz-work/TARGET/
# artifacts, with the command that reproduces each. Installs the nightly
# toolchain if missing and cargo-fuzz (pinned) into target/tools. Safe to
# run again: each run works in fresh directories under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "fuzz: $*" >&2; }

CARGO_FUZZ_VERSION=0.13.2
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
ALL_TARGETS=(frame_decode message_decode delta_decode checkpoint_assembler nbd_request config_toml libvirt_xml channel_records handshake)

secs=60 mode=run merge=1 targets=()
for arg in "$@"; do
    case "$arg" in
        --smoke) secs=10 merge=0 ;;
        --seed) mode=seed ;;
        --cmin) mode=cmin ;;
        --no-merge) merge=0 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        ''|*[!0-9]*)
            if [[ " ${ALL_TARGETS[*]} " == *" $arg "* ]]; then
                targets+=("$arg")
            else
                log "unknown argument '$arg' (targets: ${ALL_TARGETS[*]})"
                exit 2
            fi
            ;;
        *) secs=$arg ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

target=${CARGO_TARGET_DIR:-target}
tools=target/tools
work=$target/fuzz-work

if ! cargo "+$TOOLCHAIN" --version >/dev/null 2>&1; then
    log "installing the $TOOLCHAIN toolchain (cargo-fuzz needs it for the sanitizer flags)"
    rustup toolchain install "$TOOLCHAIN" --profile minimal
fi
have=$("$tools/bin/cargo-fuzz" --version 2>/dev/null || true)
if [ "${have##* }" != "$CARGO_FUZZ_VERSION" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools (once, about 2 minutes)"
    cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$tools"
fi
export PATH="$PWD/$tools/bin:$PATH"

# Input size limits: a frame or payload holds a few pages; an NBD string
# may exceed its 4096-byte limit; the libvirt fixtures are a few KB.
max_len() {
    case "$1" in
        frame_decode|message_decode) echo 16384 ;;
        nbd_request|libvirt_xml) echo 8192 ;;
        *) echo 4096 ;;
    esac
}
libfuzzer_args() {
    local t=$1
    echo "-max_len=$(max_len "$t") -timeout=10 -rss_limit_mb=2048"
    if [ -f "fuzz/dict/$t.dict" ]; then
        echo "-dict=fuzz/dict/$t.dict"
    fi
}

# Bytes in the files under a directory, in KB.
kbytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d", (s + 1023) / 1024 }'; }

mkdir -p "$work"
if [ "$mode" = cmin ]; then
    for t in "${targets[@]}"; do
        log "$t: minimizing fuzz/corpus/$t"
        # shellcheck disable=SC2046
        cargo "+$TOOLCHAIN" fuzz cmin --target-dir "$target/fuzz" "$t" "fuzz/corpus/$t" \
            -- $(libfuzzer_args "$t") 2>"$work/cmin-$t.log" >&2 ||
            { log "$t: cmin failed, see $work/cmin-$t.log"; exit 1; }
        echo "$t: $(find "fuzz/corpus/$t" -type f | wc -l) inputs, $(kbytes "fuzz/corpus/$t") KB"
    done
    exit 0
fi

log "building the fuzz targets ($TOOLCHAIN, release, ASan, debug assertions)"
cargo "+$TOOLCHAIN" fuzz build --target-dir "$target/fuzz" 2>"$work/build.log" ||
    { cat "$work/build.log" >&2; exit 1; }
bin=$target/fuzz/x86_64-unknown-linux-gnu/release

if [ "$mode" = seed ]; then
    log "writing seed inputs"
    rm -rf "$work/seeds"
    cargo run --quiet --manifest-path fuzz/Cargo.toml --target-dir "$target/fuzz" \
        --example gen_corpus -- "$work/seeds"
    for t in "${targets[@]}"; do
        mkdir -p "fuzz/corpus/$t"
        # shellcheck disable=SC2046
        "$bin/$t" -merge=1 $(libfuzzer_args "$t") "fuzz/corpus/$t" "$work/seeds/$t" \
            >"$work/seed-$t.log" 2>&1 || { log "$t: merging the seeds failed, see $work/seed-$t.log"; exit 1; }
    done
    exit 0
fi

# The last libFuzzer status line ("#N DONE cov: C ft: F corp: ..."): cov is
# the code edges reached, ft the finer-grained features (edge counts,
# comparisons) that decide what enters the corpus.
field() { grep -E '^#[0-9]+' "$1" | tail -n1 | grep -oE "$2: [0-9]+" | grep -oE '[0-9]+$' || echo "-"; }
final_stat() { grep -E "^stat::$2:" "$1" | grep -oE '[0-9]+$' || echo "-"; }

rows=() failed=0 start=$(date +%s)
for t in "${targets[@]}"; do
    d=$work/$t
    rm -rf "$d"
    mkdir -p "$d/new" "$d/artifacts" "fuzz/corpus/$t"
    log "$t: ${secs}s"
    # New inputs go to $d/new (the first directory); the committed corpus
    # is read, never written, during the run.
    # shellcheck disable=SC2046
    if "$bin/$t" -max_total_time="$secs" -print_final_stats=1 $(libfuzzer_args "$t") \
        -artifact_prefix="$d/artifacts/" "$d/new" "fuzz/corpus/$t" >"$d/log" 2>&1; then
        status=ok
    else
        status=FAILED failed=1
    fi
    found=$(find "$d/artifacts" -type f | wc -l)
    if [ "$status" = FAILED ]; then
        grep -E 'ERROR: libFuzzer|panicked at|SUMMARY' "$d/log" | head -n 5 >&2 || true
        for a in "$d"/artifacts/*; do
            [ -e "$a" ] && log "$t: reproduce with: $bin/$t $a"
        done
        [ "$found" -gt 0 ] || log "$t: failed without an artifact, see $d/log"
    elif [ "$merge" = 1 ]; then
        # shellcheck disable=SC2046
        "$bin/$t" -merge=1 $(libfuzzer_args "$t") "fuzz/corpus/$t" "$d/new" >"$d/merge.log" 2>&1 ||
            { log "$t: merge failed, see $d/merge.log"; failed=1; }
    fi
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    kb=$(kbytes "fuzz/corpus/$t")
    rows+=("$(printf '%-21s %12s %8s %7s %7s %8s %8s %7s  %s' "$t" \
        "$(final_stat "$d/log" number_of_executed_units)" "$(final_stat "$d/log" average_exec_per_sec)" \
        "$(field "$d/log" cov)" "$(field "$d/log" ft)" "$corpus" "$kb" "$found" "$status")")
done

echo
printf '%-21s %12s %8s %7s %7s %8s %8s %7s  %s\n' target executions exec/s cov ft corpus KB crashes status
for r in "${rows[@]}"; do echo "$r"; done
echo "(${secs}s per target, $(( $(date +%s) - start ))s in all; logs in $work/TARGET/log)"
exit "$failed"
