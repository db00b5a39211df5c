/**
 * How results and errors reach the user: stdout carries only the result (one JSON object with
 * --json, else a short human summary); diagnostics go to stderr.
 */
import { CloudletError, classifyFsError } from '../util/errors.js';
import { ExitCode } from '../util/exit-codes.js';

export interface GlobalOptions {
  json?: boolean;
  quiet?: boolean;
  /** Base library directory (--library, else $CLOUDLET_LIBRARY, else the XDG data dir). */
  library?: string;
}

/**
 * Text from an input (an overlay header, a manifest, a file name) made safe for a terminal:
 * control characters (C0 except newline and tab, DEL, C1) become \xNN escapes, so no escape
 * sequence of an input ever reaches the terminal.
 */
export function clean(text: string, keepNewlines = true): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) =>
    keepNewlines && (c === '\n' || c === '\t') ? c : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
  );
}

let finished = false;

/**
 * True once the process printed its one final message (a result or an error): nothing else
 * may follow on stdout (an interrupt arriving late must not add a second JSON object).
 */
export function outputFinished(): boolean {
  return finished;
}

export function printResult(opts: GlobalOptions, result: object, human: () => string): void {
  if (finished) return;
  if (opts.json) {
    finished = true;
    process.stdout.write(JSON.stringify(result) + '\n');
  } else if (!opts.quiet) process.stdout.write(clean(human()) + '\n');
}

/**
 * Prints an error as one line on stderr (and with --json as the one JSON object on stdout) and
 * returns the exit code the process must end with. Only the first call prints: a process reports
 * one outcome. A file-system error becomes its class first (no space, not found, …).
 */
export function reportError(err: unknown, json: boolean): number {
  const classified = classifyFsError(err);
  const first = !finished;
  finished = true;
  if (classified instanceof CloudletError) {
    if (first) {
      if (json) process.stdout.write(JSON.stringify(classified.toJSON()) + '\n');
      process.stderr.write(`cloudlet-overlay: ${clean(classified.message, false)}\n`);
    }
    return classified.exitCode;
  }
  const e = classified as NodeJS.ErrnoException;
  const message = e?.message ?? String(classified);
  if (first) {
    if (json) {
      process.stdout.write(
        JSON.stringify({ message_type: 'error', code: 'InternalError', exit_code: ExitCode.internal, message }) + '\n',
      );
    }
    process.stderr.write(`cloudlet-overlay: internal error: ${clean(message, false)}\n`);
    if (process.env.CLOUDLET_DEBUG) process.stderr.write(`${e?.stack ?? ''}\n`);
  }
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
