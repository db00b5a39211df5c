/**
 * Instances: synthesized VMs started from library bases. Each has a directory
 * <root>/instances/<iid>/ with its disk, memory, QEMU sockets and logs, and a state.json
 * naming its QEMU process. An instance whose process is gone is reported "dead", not hidden.
 */
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../util/atomic.js';
import { isAlive, ownerIsDead, ownerTag } from '../util/owner.js';

export { isAlive, processStart } from '../util/owner.js';
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
  /** Raw QEMU options the operator added (--qemu-arg); not part of the spec, not kept by a snapshot. */
  host_args?: string[];
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

/** The file naming the process that creates an instance directory, until state.json exists. */
export const OWNER_FILE = '.owner';

/**
 * Creates an instance directory and records this process as its owner: if the process dies
 * before the instance is recorded (state.json), the next run sweeps the directory (api/gc.ts).
 */
export async function claimInstanceDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, OWNER_FILE), `${ownerTag()}-0\n`);
}

/** An instance directory without state.json whose creating process is gone: a leftover. */
export async function abandonedInstanceDir(dir: string): Promise<boolean> {
  const state = await readFile(join(dir, 'state.json')).catch(() => undefined);
  if (state) return false;
  const owner = await readFile(join(dir, OWNER_FILE), 'utf8').catch(() => undefined);
  return owner !== undefined && (await ownerIsDead(owner.trim()));
}
