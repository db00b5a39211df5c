/**
 * What a cloudlet says about itself, for clients choosing one (GET /v1/info, the mDNS TXT
 * record, directory heartbeats): its API URL, the bases it holds, free memory and CPU.
 */
import { cpus, freemem, loadavg, totalmem } from 'node:os';
import { listBases } from '../base/library.js';
import { VERSION } from '../util/version.js';
import type { CloudletInfoMessage } from './remote.js';

export interface CloudletState {
  name: string;
  url: string;
  synthesesRunning: number;
  maxSyntheses: number;
  launcher: string;
}

export async function cloudletInfo(root: string, s: CloudletState): Promise<CloudletInfoMessage> {
  const bases = await listBases(root);
  return {
    message_type: 'cloudlet_info',
    name: s.name,
    url: s.url,
    version: VERSION,
    bases: bases.map((b) => ({ id: b.id, name: b.name })),
    mem_free_bytes: freemem(),
    mem_total_bytes: totalmem(),
    cpus: cpus().length,
    load1: Math.round((loadavg()[0] ?? 0) * 100) / 100,
    syntheses_running: s.synthesesRunning,
    max_syntheses: s.maxSyntheses,
    launcher: s.launcher,
  };
}
