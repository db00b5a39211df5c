/**
 * Which process owns a temporary file, lock or staging directory, and whether it still runs.
 * A process is named by its pid and its start time (field 22 of /proc/<pid>/stat): a pid reused
 * by another process after a crash has another start time, so a leftover of a dead run is never
 * mistaken for a live one. Names carry the owner as `<pid>.<start>` (ownerTag()), so a sweep can
 * tell leftovers from live work by the name alone.
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';

/** Start time of a process (field 22 of /proc/<pid>/stat), or undefined if it does not exist. */
export async function processStart(pid: number): Promise<string | undefined> {
  try {
    return startField(await readFile(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return undefined;
  }
}

function startField(stat: string): string | undefined {
  // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  if (fields[0] === 'Z') return undefined; // a zombie is dead
  return fields[19];
}

export async function isAlive(pid: number, start: string): Promise<boolean> {
  return (await processStart(pid)) === start;
}

let tag: string | undefined;

/** This process as `<pid>.<start>` (start 0 where /proc is missing). */
export function ownerTag(): string {
  if (tag === undefined) {
    let start = '0';
    try {
      start = startField(readFileSync(`/proc/${process.pid}/stat`, 'utf8')) ?? '0';
    } catch {
      // no /proc: pid alone
    }
    tag = `${process.pid}.${start}`;
  }
  return tag;
}

/**
 * The owner tag inside a name made with ownerTag(), e.g. `import-123.4567-ab12cd` or
 * `download-123.4567-ab12cd.overlay` → pid 123, start 4567.
 */
export function ownerOf(name: string): { pid: number; start: string } | undefined {
  const m = /(?:^|[-.])(\d+)\.(\d+)-[0-9A-Za-z]+(?:\.[a-z]+)?$/.exec(name);
  if (!m) return undefined;
  return { pid: Number(m[1]), start: m[2]! };
}

/**
 * True when a name made with ownerTag() belongs to a process that is gone. Names without an
 * owner tag are never called dead (they may be someone else's).
 */
export async function ownerIsDead(name: string): Promise<boolean> {
  const o = ownerOf(name);
  if (!o) return false;
  if (o.pid === process.pid) return `${o.pid}.${o.start}` !== ownerTag();
  if (o.start === '0') return (await processStart(o.pid)) === undefined;
  return !(await isAlive(o.pid, o.start));
}
