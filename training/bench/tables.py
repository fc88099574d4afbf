"""What the subcommands print: each table as a list of lines, from the results they measured."""


def fmt(value, spec, missing=""):
    """``format(value, spec)``, or ``missing`` for None and NaN."""
    return missing if value is None or value != value else format(value, spec)


# --- medt-bench models ---

MODELS_HEADER = (
    f"{'model':<10} {'size':>4} {'implementation':<30} {'train img/s':>11} {'infer img/s':>11} "
    f"{'compile s':>9} {'step RSS GiB':>12} {'peak RSS GiB':>12} {'XLA temp GiB':>12} "
    f"{'fwd GFLOP':>9} {'% peak':>6}"
)


def models_row(model, size, name, result):
    """One measured implementation of one model and size (``MODELS_HEADER``'s columns)."""
    return (
        f"{model:<10} {size:>4} {name:<30} {result['train_images_per_second']:>11.2f} "
        f"{result['infer_images_per_second']:>11.2f} {fmt(result.get('compile_seconds'), '9.1f'):>9} "
        f"{fmt(result.get('train_step_peak_rss_gib'), '.2f'):>12} {result['peak_rss_gib']:>12.2f} "
        f"{fmt(result.get('xla_train_temp_gib'), '.2f'):>12} "
        f"{fmt(result.get('infer_flops_per_image', float('nan')) / 1e9, '.2f'):>9} "
        f"{fmt(100 * result.get('train_fraction_of_peak', float('nan')), '.1f'):>6}"
    )


def models_ratio_row(name, ours, official):
    """How many times faster (and leaner per step) ours is than the official code measured beside it."""
    return (
        f"{'':<10} {'':>4} {'x official: ' + name[len('medt-keras'):].strip():<30} "
        f"{official['train_seconds'] / ours['train_seconds']:>10.2f}x "
        f"{official['infer_seconds'] / ours['infer_seconds']:>10.2f}x {'':>9} "
        f"{ours['train_step_peak_rss_gib'] / official['train_step_peak_rss_gib']:>11.2f}x"
    )


# --- medt-bench compare ---

def format_comparison_table(rows):
    """Lines of a table: every ratio with the allocator and both sides' configuration."""
    lines = [
        f"{'model':<6} {'size':>4} {'workload':<5} {'allocator':<9} {'ours s (runs)':<24} "
        f"{'official s (runs)':<24} {'ratio':>6} {'CPU ratio':>9}  configurations: ours | official"
    ]
    for row in rows:
        ours = f"{row['ours_seconds']:.3f} (" + " ".join(f"{s:.2f}" for s in row["ours_run_seconds"]) + ")"
        official = f"{row['official_seconds']:.3f} (" + " ".join(f"{s:.2f}" for s in row["official_run_seconds"]) + ")"
        lines.append(
            f"{row['model']:<6} {row['size']:>4} {row['workload']:<5} {row['allocator'].split(' ')[0]:<9} "
            f"{ours:<24} {official:<24} {row['ratio']:>5.2f}x {row['cpu_time_ratio']:>8.2f}x  "
            f"{row['ours_config']} | {row['official_config']}"
        )
    return lines


# --- medt-bench profile ---

def profile_lines(result):
    """A step's FLOPs against the peak, then its op profile: top ops, time by source layer and by kind of op."""
    p = result["profile"]
    step = "inference batch (forward" if result.get("workload") == "infer" else "training step (forward + backward"
    allocator = result.get("allocator", "this process's allocator")
    lines = [
        f"\n{result['model']} {result['size']}x{result['size']} {step}, batch "
        f"{result['batch']}, {allocator}): {result['step_flops'] / 1e9:.1f} "
        f"GFLOP (XLA's count of the whole-tensor form; {result['step_flops_as_compiled'] / 1e9:.1f} GFLOP as "
        f"compiled, loops counted once) in {result['step_seconds']:.3f} s = {result['step_gflops_per_second']:.1f} "
        f"GFLOP/s, {100 * result['fraction_of_peak']:.1f}% of the measured peak {result['peak_gflops']:.0f} GFLOP/s"
        + (f"; over the interleaved runs' train_on_batch step ({result['train_on_batch_seconds']:.3f} s) "
           f"{100 * result['fraction_of_run_peak_train_on_batch']:.1f}% of the peak at the start of the run "
           f"({result['run_peak_gflops']:.0f} GFLOP/s)" if "train_on_batch_seconds" in result else ""),
        f"profile of {p['steps']} steps: {p['op_ms']:.0f} ms of op time on XLA's threads, {p['wall_ms']:.0f} ms wall",
        f"{'op':<40} {'opcode':<14} {'ms':>8} {'share':>6}  source",
    ]
    for op in p["top_ops"]:
        lines.append(f"{op['op'][:40]:<40} {op['opcode'][:14]:<14} {op['ms']:>8.1f} {100 * op['share']:>5.1f}%  "
                     f"{op['source']}")
    lines.append(f"by source layer (the blocked attention kernel's loops: {p.get('loops_ms', 0.0):.0f} ms inclusive):")
    lines += [f"  {s['source'][:60]:<60} {s['ms']:>8.1f} ms {100 * s['share']:>5.1f}%" for s in p["by_source"]]
    lines.append("by kind of op:")
    lines += [f"  {k['kind'][:60]:<60} {k['ms']:>8.1f} ms {100 * k['share']:>5.1f}%" for k in p.get("by_kind", [])]
    return lines


# --- medt-bench sliding-window ---

def sliding_window_lines(result):
    """The model and compile time, then per workload bare inference against the sliding window."""
    lines = [
        f"{result['model']} {result['tile']}x{result['tile']} tiles, batch {result['batch']}, overlap "
        f"{result['overlap']}, compile {result['compile_seconds']:.1f} s, process peak RSS "
        f"{result['peak_rss_gib']:.2f} GiB",
        "bare: as many tiles through the same program, the next batch dispatched before the last is waited "
        "for (one at a time in brackets); ratio: window / bare",
        f"{'workload':<24} {'tiles':>6} {'bare s':>15} {'window s':>9} {'ratio':>12} {'CPU ratio':>9} "
        f"{'MP/s':>7} {'tiles/s':>8} {'window RSS GiB':>14}",
    ]
    for w in result["workloads"]:
        bare = f"{w['bare_seconds']:.2f} ({w['bare_one_at_a_time_seconds']:.2f})"
        ratio = f"{w['ratio_to_bare']:.2f} ({w['ratio_to_bare_one_at_a_time']:.2f})"
        lines.append(
            f"{w['workload']:<24} {w['tiles']:>6} {bare:>15} {w['sliding_window_seconds']:>9.2f} "
            f"{ratio:>12} {w['ratio_to_bare_cpu_time']:>9.2f} {w['megapixels_per_second']:>7.3f} "
            f"{w['sliding_window_tiles_per_second']:>8.1f} {fmt(w['window_peak_rss_gib'], '.2f'):>14}")
    return lines


# --- medt-bench loader ---

def loader_header(rates):
    return (f"{'loader':<8} {'workers':>7} {'startup s':>9} {'img/s':>8} "
            + " ".join(f"{'x ' + m + ' train':>13}" for m in rates) + f" {'worker RSS GiB':>14}")


def loader_row(result, rates):
    return (f"{result['loader']:<8} {result['workers']:>7} {result['startup_seconds']:>9.2f} "
            f"{result['images_per_second']:>8.0f} "
            + " ".join(f"{result['times_training_rate'][m]:>12.0f}x" for m in rates)
            + f" {fmt(result['worker_peak_rss_gib'], '.2f'):>14}")
