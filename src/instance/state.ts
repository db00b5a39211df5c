/**
 * Instances: synthesized VMs started from library bases. Each has a directory
 * <root>/instances/<iid>/ with its disk, memory, QEMU sockets and logs, and a state.json
 * naming its QEMU process. An instance whose process is gone is reported "dead", not hidden.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/atomic.js';
import type { PortForward, VmSpec } from '../spec/vm-spec.js';

export interface InstanceState {
  id: string;
  base_id: string;
  overlay: string;
  pid: number;
  /** Linux process start time (from /proc/<pid>/stat), to tell a reused pid from ours. */
  pid_start: string;
  created_at: string;
  accel: string;
  dir: string;
  qmp_socket: string;
  serial_socket: string;
  serial_log: string;
  stderr_log: string;
  /** The guest agent channel's host socket (a spec with guestAgent). */
  agent_socket?: string;
  forwards: PortForward[];
  /** Who runs its QEMU (absent: qemu, from before launchers). */
  launcher?: 'qemu' | 'libvirt';
  /** The libvirt domain's name (launcher libvirt). */
  domain?: string;
  /** The spec QEMU was started from (what a snapshot of the instance must match). */
  spec: VmSpec;
}

export type InstanceStatus = 'running' | 'dead';

/** Where instances live: <root>/instances (beside the base library's bases/ and tmp/). */
export function instancesDir(root: string): string {
  return join(root, 'instances');
}

export function instanceDir(root: string, iid: string): string {
  return join(instancesDir(root), iid);
}

export async function writeInstance(root: string, s: InstanceState): Promise<void> {
  await writeFileAtomic(join(instanceDir(root, s.id), 'state.json'), JSON.stringify(s, null, 2) + '\n');
}

export async function readInstance(root: string, iid: string): Promise<InstanceState | undefined> {
  try {
    return JSON.parse(await readFile(join(instanceDir(root, iid), 'state.json'), 'utf8')) as InstanceState;
  } catch {
    return undefined;
  }
}

export async function listInstances(root: string): Promise<Array<InstanceState & { status: InstanceStatus }>> {
  let names: string[];
  try {
    names = await readdir(instancesDir(root));
  } catch {
    return [];
  }
  const out: Array<InstanceState & { status: InstanceStatus }> = [];
  for (const n of names.sort()) {
    const s = await readInstance(root, n);
    if (s) out.push({ ...s, status: (await isAlive(s.pid, s.pid_start)) ? 'running' : 'dead' });
  }
  return out;
}

/** Start time of a process (field 22 of /proc/<pid>/stat), or undefined if it does not exist. */
export async function processStart(pid: number): Promise<string | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (fields[0] === 'Z') return undefined; // a zombie is dead
    return fields[19];
  } catch {
    return undefined;
  }
}

export async function isAlive(pid: number, start: string): Promise<boolean> {
  return (await processStart(pid)) === start;
}
