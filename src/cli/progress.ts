/** The CLI's Progress: an ora spinner with a percentage on a TTY, nothing otherwise. */
import type { Ora } from 'ora';
import type { Progress } from '../util/progress.js';
import { silent } from '../util/progress.js';

const MiB = 1024 * 1024;

// ora (and its dependencies) cost ~50 ms to load: only when there is a terminal to draw on.
// A terminal that reports no width (e.g. under `script` without a size) makes ora redraw an
// unbounded number of lines: no spinner there either.
const ora = process.stderr.isTTY && (process.stderr.columns ?? 0) > 0 ? (await import('ora')).default : undefined;

class SpinnerProgress implements Progress {
  private spinner: Ora | undefined;
  private label = '';
  private total = 0;
  private doneBytes = 0;
  private started = 0;
  private lastRender = 0;

  step(label: string, total?: number): void {
    this.spinner?.stop();
    this.label = label;
    this.total = total ?? 0;
    this.doneBytes = 0;
    this.started = performance.now();
    this.spinner = ora?.({ text: label, stream: process.stderr }).start();
  }

  advance(n: number): void {
    this.doneBytes += n;
    const now = performance.now();
    if (!this.spinner || now - this.lastRender < 100) return;
    this.lastRender = now;
    const mib = (this.doneBytes / MiB).toFixed(0);
    const rate = (this.doneBytes / MiB / Math.max(0.001, (now - this.started) / 1000)).toFixed(0);
    this.spinner.text =
      this.total > 0
        ? `${this.label} ${Math.min(100, (100 * this.doneBytes) / this.total).toFixed(0)}% ` +
          `(${mib}/${(this.total / MiB).toFixed(0)} MiB, ${rate} MiB/s)`
        : `${this.label} ${mib} MiB (${rate} MiB/s)`;
  }

  done(summary?: string): void {
    const secs = ((performance.now() - this.started) / 1000).toFixed(1);
    this.spinner?.succeed(`${summary ?? this.label} (${secs} s)`);
    this.spinner = undefined;
  }

  fail(summary?: string): void {
    this.spinner?.fail(summary ?? this.label);
    this.spinner = undefined;
  }
}

/** A spinner only when stderr is a terminal and the output is for humans. */
export function makeProgress(opts: { json?: boolean; quiet?: boolean }): Progress {
  if (opts.json || opts.quiet || !ora) return silent;
  return new SpinnerProgress();
}
