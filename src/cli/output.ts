/**
 * How results and errors reach the user: stdout carries only the result (one JSON object with
 * --json, else a short human summary); diagnostics go to stderr.
 */
import { CloudletError } from '../util/errors.js';
import { ExitCode } from '../util/exit-codes.js';

export interface GlobalOptions {
  json?: boolean;
  quiet?: boolean;
  /** Base library directory (--library, else $CLOUDLET_LIBRARY, else the XDG data dir). */
  library?: string;
}

export function printResult(opts: GlobalOptions, result: object, human: () => string): void {
  if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
  else if (!opts.quiet) process.stdout.write(human() + '\n');
}

/** Prints an error as one line (or a JSON object) and returns the exit code. */
export function reportError(err: unknown, json: boolean): number {
  if (err instanceof CloudletError) {
    if (json) process.stdout.write(JSON.stringify(err.toJSON()) + '\n');
    process.stderr.write(`cloudlet-overlay: ${err.message}\n`);
    return err.exitCode;
  }
  const e = err as NodeJS.ErrnoException;
  const message = e?.code === 'ENOSPC' ? 'no space left on the device' : (e?.message ?? String(err));
  if (json) {
    process.stdout.write(
      JSON.stringify({ message_type: 'error', code: 'InternalError', exit_code: ExitCode.internal, message }) + '\n',
    );
  }
  process.stderr.write(`cloudlet-overlay: internal error: ${message}\n`);
  if (process.env.CLOUDLET_DEBUG) process.stderr.write(`${e?.stack ?? ''}\n`);
  return ExitCode.internal;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function bytes(n: number): string {
  let v = n;
  let u = 0;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${UNITS[u]}`;
}

export function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

/** Left-aligned text table. */
export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows
    .map((r) =>
      r
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
