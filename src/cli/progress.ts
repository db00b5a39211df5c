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
    const perSec = this.doneBytes / Math.max(0.001, (now - this.started) / 1000);
    const rate = `${(perSec / MiB).toFixed(perSec < 10 * MiB ? 1 : 0)} MiB/s`;
    if (this.total > 0) {
      const frac = Math.min(1, this.doneBytes / this.total);
      const bar = '█'.repeat(Math.round(frac * 20)).padEnd(20, '░');
      const eta = perSec > 0 ? Math.max(0, (this.total - this.doneBytes) / perSec) : Infinity;
      this.spinner.text =
        `${this.label} ${bar} ${(frac * 100).toFixed(0)}% ${mib}/${(this.total / MiB).toFixed(0)} MiB, ${rate}` +
        (Number.isFinite(eta) ? `, ETA ${formatEta(eta)}` : '');
    } else {
      this.spinner.text = `${this.label} ${mib} MiB (${rate})`;
    }
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

function formatEta(s: number): string {
  if (s < 60) return `${s.toFixed(0)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** A spinner only when stderr is a terminal and the output is for humans. */
export function makeProgress(opts: { json?: boolean; quiet?: boolean }): Progress {
  if (opts.json || opts.quiet || !ora) return silent;
  return new SpinnerProgress();
}
