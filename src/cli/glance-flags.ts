/** The options that say where Glance is and how a pushed image is shared (docs/openstack.md). */
import { Option } from 'commander';

export const GLANCE_HELP =
  'Glance endpoint (default: $CLOUDLET_GLANCE_URL, else the OS_* variables: docs/openstack.md)';

export function visibilityOption(): Option {
  return new Option('--visibility <v>', 'Glance image visibility (default: Glance\'s, "shared")').choices([
    'public',
    'community',
    'shared',
    'private',
  ]);
}
