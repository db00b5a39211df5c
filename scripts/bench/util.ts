/** Small helpers shared by the benchmark scripts: formatting, timing, sizes. */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';

const MiB = 2 ** 20;

export function fmtBytes(n: number): string {
  return n >= MiB ? `${(n / MiB).toFixed(2)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
}

/** Right-aligned columns after the first. */
export function table(rows: string[][]): string {
  const w: number[] = [];
  for (const r of rows) r.forEach((c, i) => (w[i] = Math.max(w[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]!) : c.padStart(w[i]!))).join('  ')).join('\n');
}

export async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const t = performance.now();
  const r = await fn();
  return [r, performance.now() - t];
}

export async function size(path: string): Promise<number> {
  return (await stat(path)).size;
}

export async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) n += (await stat(join(e.parentPath, e.name))).size;
  }
  return n;
}

/** A CLI run's JSON, or it throws with the end of its stderr (test/helpers/cli.ts). */
export { ok as must } from '../../test/helpers/cli.js';

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}
